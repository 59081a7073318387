"""The adapter marketplace: listings of tuned adapters that buyers query through the coordinator (never seeing a
weight), buyers with hashed API keys, quotas and rate limits, metered usage, data owners' payouts and a
hash-chained audit log, all in ``STATE/market.db``."""
