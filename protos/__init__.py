"""The wire contract shared by the coordinator and data owners: protobufs, crypto, bundle and delta formats."""
