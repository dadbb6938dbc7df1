"""Where KV bytes live: tiers, host layouts and the codec contract."""
