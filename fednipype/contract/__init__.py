"""The release contract, the only thing that crosses between a site and the hub; imports neither side."""
