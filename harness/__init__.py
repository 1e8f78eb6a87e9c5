"""The test and bench harness, outside the product: free ports, a child-process server, an
in-thread ASGI server and a private Redis, each written once. ``app`` never imports it.
"""
