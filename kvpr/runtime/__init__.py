"""Executes a plan: prefill and decode steps, streams, prefetch, write-back."""
