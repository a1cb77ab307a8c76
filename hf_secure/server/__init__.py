"""The computing server: runs a converted checkpoint, keeps per-session KV caches, holds no key."""
