"""Launchers: local multi-process runs (local.py), Cloud TPU VM pods (tpu_vm.py), GPU nodes
(gpu_node.py). All start the same `python -m train` on every process."""
