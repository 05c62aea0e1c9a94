"""Code that runs at the hub: reading releases, pooling, reports; imports nothing of a site."""
