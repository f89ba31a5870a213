"""The router: domain events in, notification intents out.

``rules`` and ``templates`` load configuration, ``mapping`` is the pure function from one
event to its intents, ``app`` is the Faust agent that runs it over the event topics.
"""
