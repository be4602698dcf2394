"""A reference revenue funnel and a PostHog-compatible server, run locally for the demo and tests.

``funnel``          the funnel web app (leads; payments and approvals in their own modules)
``posthog``         capture endpoints the official SDK uses + the HogQL query subset we send
``runner``          starts both on loopback ports in a background thread
"""
