"""The release contract: the only thing that crosses from a site to the hub; imports neither."""
