"""What `emotune train` prints: one plain line per epoch and a summary, none of Ray's own log lines."""
from __future__ import annotations

from distributed.progress import epoch_line


def test_epoch_line_reads_plainly_and_estimates_what_is_left():
    times = []
    row = {"epoch": 2, "train_loss": 1.5, "val_loss": 1.25, "val_acc": 0.5, "val_macro_f1": 0.375,
           "images_per_s": 812.4, "epoch_s": 30.0}
    assert epoch_line(row, 6, times) == ("epoch 2/6  train_loss 1.5000  val_loss 1.2500  val_acc 0.5000  "
                                         "val_macro_f1 0.3750  812 img/s  ETA 2m00s")
    assert "diverged" in epoch_line({"epoch": 3, "diverged": True}, 6, times)
    assert epoch_line(dict(row, epoch=6, early_stopped=True), 6, times).endswith(
        "ETA 0m00s  early stop: no improvement for early_stop_patience epochs")


def test_live_bar_on_a_terminal_only(tmp_path, monkeypatch):
    """Between epoch lines a terminal sees the epoch under way (paced by the last epoch); a pipe sees the lines only."""
    import io
    import time

    from distributed.progress import follow

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, live in ((Terminal(), True), (io.StringIO(), False)):
        log = tmp_path / f"progress-{live}.log"
        monkeypatch.setattr("sys.stdout", stream)
        with follow(log, epochs=2, every=0.05):
            time.sleep(0.3)
            log.write_text("epoch 1/2  train_loss 1.0\n")
            time.sleep(0.3)
            with open(log, "a") as f:
                f.write("epoch 2/2  train_loss 0.9\n")
            time.sleep(0.2)
        out = stream.getvalue()
        assert "epoch 1/2  train_loss 1.0\n" in out and "epoch 2/2  train_loss 0.9\n" in out
        assert ("epoch 1/2  running 0m00s" in out and "epoch 2/2  [" in out and "s left" in out) == live
        assert ("\r" in out) == live


def test_tune_trial_lines_read_plainly():
    """What `emotune tune` prints per trial event (instead of Ray's table, which --verbose keeps)."""
    from distributed.trial_lines import last_error_line, trial_end_line, trial_epoch_line, trial_start_line

    assert trial_start_line("a_00001", {"lr_head": 0.003125, "dropout": 0.25, "other": 1}, ["lr_head", "dropout"]) \
        == "trial a_00001 started: lr_head 0.00313  dropout 0.25"
    row = {"epoch": 2, "val_acc": 0.5, "val_loss": 1.25, "train_loss": 1.5, "epoch_s": 3.04,
           "train_config": {"epochs": 6}}
    assert trial_epoch_line("a_00001", row, "val_acc") == \
        "trial a_00001 epoch 2/6  val_acc 0.5000  val_loss 1.2500  train_loss 1.5000  3.0s"
    assert trial_epoch_line("a_00001", row, "val_loss").startswith("trial a_00001 epoch 2/6  val_loss 1.2500  train")
    assert trial_end_line("a_00001", row, "val_acc", 0.5) == \
        "trial a_00001 stopped by ASHA after epoch 2 of 6: best val_acc 0.5000"
    assert trial_end_line("a_00001", dict(row, epoch=6), "val_acc", 0.625) == \
        "trial a_00001 finished 6 epochs: best val_acc 0.6250"
    # a trial resumed at its end reports nothing new: the best comes from its last result
    assert trial_end_line("a_00001", dict(row, epoch=6, best_val_acc=0.7), "val_acc", None) == \
        "trial a_00001 finished 6 epochs: best val_acc 0.7000"
    assert "early-stopped at epoch 2" in trial_end_line("a_00001", dict(row, early_stopped=True), "val_acc", 0.5)
    assert "diverged at epoch 2" in trial_end_line("a_00001", dict(row, diverged=True), "val_acc", None)
    assert last_error_line(None).startswith("(no error text")


def test_tune_error_line_is_the_exception(tmp_path):
    from distributed.trial_lines import last_error_line

    f = tmp_path / "error.txt"
    f.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                 "\x1b[36m(TrainWorker pid=1)\x1b[0m ZeroDivisionError: float division by zero\n\n")
    assert last_error_line(str(f)) == "(TrainWorker pid=1) ZeroDivisionError: float division by zero"
