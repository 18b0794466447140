"""DaE: Stable Block Expansion of one tier, then SVD compression of what was added."""
