"""Lucity builder service: the trusted gRPC front of the build pipeline."""
