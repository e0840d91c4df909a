"""What serving and the backends say to each other, owned by neither.

``contract.generation`` holds the request and result types of one model call (the
sampling settings, a generation, its result, the cancellation flag, what a loaded
model can do); ``contract.errors`` the exceptions a backend raises and routerd answers.
Serving builds these and backends consume them, so neither imports the other: serving
knows no backend module, and backends know nothing of routerd. This package imports
nothing but the standard library.
"""
