"""Built-in passes, one per module. Each registers itself with `@register_pass`."""
