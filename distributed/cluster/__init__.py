"""Ray clusters: files.py checks cluster-launcher YAMLs and reads the node types an autoscaler may launch,
kuberay.py does the same for KubeRay RayCluster manifests, jobs.py runs `emotune tune` there as a Ray job
(`emotune submit`). common.py holds what the two file checkers share."""
