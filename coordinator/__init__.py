"""The model owner's side: bundles, the gRPC service, federated rounds, plug-in, evaluation and export."""
