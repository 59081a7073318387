"""The data owner's side: verify bundles, train the adapter on the emulator, seal and submit deltas."""
