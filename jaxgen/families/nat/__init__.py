"""MaskGIT / AutoNAT: masked-token modeling with parallel decoding under a (searchable) generation policy."""
