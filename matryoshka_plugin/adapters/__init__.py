"""One adapter per upstream tool. Each subclasses or wraps; none copies upstream code."""
