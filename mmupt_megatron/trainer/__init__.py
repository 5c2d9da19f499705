"""The MM-UPT trainer: rollout -> vote -> advantages -> train -> refit -> checkpoint."""
