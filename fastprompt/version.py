"""The library's version, in a leaf module: the package face and the save formats read it from here."""

__version__ = "0.1.0"
