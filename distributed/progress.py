"""What `emotune train` shows and keeps per epoch: the epoch line, the live view of the progress file while a run
trains (follow), TensorBoard scalars, and the Ray Train callbacks that write both from the Train controller."""
from __future__ import annotations

import contextlib
from pathlib import Path


def tensorboard_callback(logdir: str):
    """Ray Train callback writing each report as TensorBoard scalars. It runs in the Train controller, which
    Ray places on the driver's node, so logdir is a local path of the machine that launched the run."""
    from ray.train.v2.api.callback import UserCallback

    class TensorBoard(UserCallback):
        def __init__(self):
            self.writer = None

        def after_report(self, run_context, metrics, checkpoint):
            from tensorboardX import SummaryWriter

            self.writer = self.writer or SummaryWriter(logdir)
            write_scalars(self.writer, metrics[0])

    return TensorBoard()


def write_scalars(writer, row: dict) -> None:
    """One report's numbers as TensorBoard scalars at its epoch."""
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            writer.add_scalar(key, value, global_step=row.get("epoch", 0))
    writer.flush()


def progress_callback(path: str, epochs: int):
    """Ray Train callback writing one plain line per epoch to `path` (the controller's prints would reach the
    terminal prefixed with its actor name; the driver prints this file's new lines instead: follow())."""
    from ray.train.v2.api.callback import UserCallback

    class Progress(UserCallback):
        def __init__(self):
            self.epoch_times = []

        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(epoch_line(metrics[0], epochs, self.epoch_times) + "\n")

    return Progress()


def epoch_line(row: dict, epochs: int, epoch_times: list[float]) -> str:
    """`epoch 3/10  train_loss 1.2345  val_loss ...  412 img/s  ETA 1m05s`; epoch_times collects epoch_s."""
    head = f"epoch {row.get('epoch', '?')}/{epochs}"
    if row.get("diverged"):
        return f"{head}  diverged: the loss is not finite (NaN/inf); the run stops (try a lower lr_head/lr_backbone)"
    epoch_times.append(float(row.get("epoch_s", 0.0)))
    left = max(0, epochs - int(row["epoch"])) * sum(epoch_times) / len(epoch_times)
    line = (f"{head}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}"
            f"  val_macro_f1 {row['val_macro_f1']:.4f}  {row.get('images_per_s', 0):.0f} img/s"
            f"  ETA {int(left) // 60}m{int(left) % 60:02d}s")
    return line + ("  early stop: no improvement for early_stop_patience epochs" if row.get("early_stopped") else "")


@contextlib.contextmanager
def follow(path: Path, epochs: int = 0, every: float = 0.5):
    """Print the lines appended to `path` while the block runs (from where the file ends now: a resumed run
    does not repeat earlier epochs), and any left when it ends. On a terminal, a live bar between the lines shows
    the epoch under way, paced by how long the last epoch took."""
    import re
    import sys
    import threading
    import time

    start = path.stat().st_size if path.exists() else 0
    done = threading.Event()
    live = sys.stdout.isatty() and epochs > 0
    seen, last_at, last_gap = 0, time.monotonic(), None

    def bar(now: float) -> str:
        elapsed = now - last_at
        if last_gap is None:
            return f"epoch {seen + 1}/{epochs}  running {int(elapsed) // 60}m{int(elapsed) % 60:02d}s"
        filled = int(20 * min(elapsed / last_gap, 0.99))
        return f"epoch {seen + 1}/{epochs}  [{'#' * filled}{'.' * (20 - filled)}]  ~{max(0, last_gap - elapsed):.0f}s left"

    def pump():
        nonlocal start, seen, last_at, last_gap
        while True:
            stop = done.wait(every)
            now = time.monotonic()
            complete = ""
            if path.exists():
                with open(path) as f:
                    f.seek(start)
                    text = f.read()
                complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next look
                start += len(complete.encode())
            if complete:
                print(("\r\033[K" if live else "") + complete, end="", flush=True)
                numbers = re.findall(r"^epoch (\d+)/", complete, re.M)
                if numbers:
                    seen, last_gap, last_at = int(numbers[-1]), now - last_at, now
            if stop:
                if live:
                    print("\r\033[K", end="", flush=True)
                return
            if live and seen < epochs:
                print("\r\033[K" + bar(now), end="", flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
