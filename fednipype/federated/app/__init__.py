"""The Flower app of federated statistics: a hub's server app and a site's client app."""
