"""Code that runs at the hub: loading and checking releases, pooling maths and reports; imports nothing of the site."""
