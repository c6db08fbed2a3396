"""Real daemons on loopback for the tests (and the demo): buildkitd, registry, Kubernetes."""
