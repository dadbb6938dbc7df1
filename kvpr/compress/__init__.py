"""KV codecs: packed quantisation (int8/int4), KIVI 2-bit and KVO. No knowledge of tiers."""
