"""Ray clusters: files.py checks cluster-launcher YAMLs, kuberay.py KubeRay RayCluster manifests, nodes.py reads
the node types an autoscaler may launch (from such a file, or from the config `ray up` left on the head) for
planning a search, jobs.py runs `emotune tune` there as a Ray job (`emotune submit`). common.py holds what they
share, NodeType included; nothing here imports plan.py or anything that imports torch."""
