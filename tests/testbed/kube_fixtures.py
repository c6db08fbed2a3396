"""Pytest fixtures for etcd, kube-apiserver and kube-controller-manager."""
