"""ShuntFlow: move container TCP connections from the VXLAN overlay to the host network."""

__version__ = "0.1.0"
