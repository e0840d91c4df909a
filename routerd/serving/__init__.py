"""Serving, below HTTP: a validated request becomes backend calls and results.

The HTTP layer (``routerd.api``) parses and authorizes a request, takes a lease from
the scheduler and hands serving the lease's ``ModelHandle``; serving prepares the
prompts (tokenize, fit to the context, the version's caps), runs them through the
handle and returns results or a stream of pieces. It knows the handle, never the
instance, batcher or model behind it; the HTTP layer then writes the answer.
"""
