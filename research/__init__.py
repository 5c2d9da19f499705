"""Research harnesses: experiments that de-risk recipes outside the product loop (not part of the package)."""
