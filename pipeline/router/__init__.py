"""The router: domain events in, notification intents out.

``rules`` and ``templates`` load configuration, ``mapping`` is the pure function from one
event to its intents, ``handler`` decodes, maps and encodes one record, ``handling`` holds
through registry outages and stops on the unexpected. Two engines run it over the event
topics: ``loop`` (default), a transactional loop on confluent-kafka, and ``app``, the Faust
agent (at-least-once only).
"""
