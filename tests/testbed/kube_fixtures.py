"""Pytest fixtures for etcd, kube-apiserver and kube-controller-manager (filled by the control-plane work)."""
