"""The permute protocol (STIP): the server computes on hidden states in a secretly permuted basis."""
