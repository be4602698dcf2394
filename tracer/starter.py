"""``funnel-tracer init``: a commented starter spec for the sinks a user names.

Why: most options were found only by reading the source. The starter shows the common ones in
place, with comments, and is valid as written once its ``${VARS}`` are set (a test sets them and
validates the output), so a new user edits a working spec instead of writing one from nothing.
"""

from __future__ import annotations

HEADER = """\
# funnel-tracer starter spec, written by `funnel-tracer init{flags}`.
# yaml-language-server: $schema=./funnel-spec.schema.json
#   (completion and inline errors in editors: `funnel-tracer schema > funnel-spec.schema.json`)
#
# Set these, then `funnel-tracer validate -c {name}` and `funnel-tracer check -c {name}`:
{env}#
# Every option: docs/REFERENCE.md (or `funnel-tracer schema --markdown`).
service: my-funnel

# Credentials for injection, declared once; a request uses one with `auth: <name>`.
# Other kinds: {{token: "${{API_TOKEN}}"}}, {{oauth2: {{token_url, client_id, client_secret, scope}}}},
# {{command: {{argv: [vault, read, -field=token, secret/canary], ttl: 10m}}}}.
auth:
  app:
    login:                                    # refreshed before expires_in, and on a 401
      url: ${{FUNNEL_URL}}/api/v1/auth/login
      json: {{username: "${{FUNNEL_USER}}", password: "${{FUNNEL_PASSWORD}}"}}
      token: {{json: access_token}}             # or {{header: X-Auth-Token}} / {{cookie: session}}
      expires_in: {{json: expires_in}}          # or ttl: 25m

collectors:
"""

COLLECTORS = {
    "posthog": """\
  posthog:                                    # polls the HogQL query API: one query per cycle for all probes
    host: ${POSTHOG_HOST}                     # the app host, e.g. https://us.posthog.com (not the capture host)
    project_id: "${POSTHOG_PROJECT_ID}"
    personal_api_key: ${POSTHOG_PERSONAL_API_KEY}   # scope "Query Read"; never printed
    queries_per_minute: 240                   # PostHog's limits; budget_share of them is used
    queries_per_hour: 2400
    budget_share: 0.5
""",
    "redis_dlq": """\
  redis_dlq:
    url: ${DLQ_REDIS_URL}                     # redis:// or rediss://, may carry a password (redacted)
    mode: poll                                # or push: keyspace notifications
""",
    "webhook": """\
  webhook:                                    # receives the funnel's Slack-style / JSON notifications
    host: 127.0.0.1                           # 0.0.0.0 needs allow_public: true
    port: 8787
    secret_path: ${WEBHOOK_SECRET_PATH}       # the funnel posts to /<secret>/<path>; or hmac_secret
""",
    "smtp": """\
  smtp:                                       # a mailbox the funnel's notification e-mails reach
    host: 127.0.0.1
    port: 2525
    rcpt_token: ${SMTP_RCPT_TOKEN}            # mail approver+<token>@...; or auth_username/auth_password
""",
}

LEAD = """\
  lead:                                       # SLO: lead capture -> PostHog event < 5 s
    interval: 5m                              # canary: one probe every 5 minutes
    inject:
      http:
        url: ${FUNNEL_URL}/api/v1/leads
        auth: app
        json:
          email: canary+{trace_id}@example.com   # the trace id is the needle the hop looks for
          metadata: {canary_trace_id: "{trace_id}", synthetic: true}
        capture: {lead_id: id}                # from the JSON response: {capture.lead_id} below
    hops:
      - name: posthog_event
        target: 5s
        posthog: {event: lead_captured, property: canary_trace_id}
    cleanup:                                  # runs after the probe resolved; never changes a verdict
      - {method: DELETE, url: "${FUNNEL_URL}/api/v1/leads/{capture.lead_id}", auth: app}
"""

DLQ = """\
  dlq:                                        # SLO: DLQ entry -> first retry < 60 s
    interval: 5m
    inject:
      redis_dlq:                              # a synthetic entry in the funnel's own format
        url: ${DLQ_REDIS_URL}
        key: dlq:webhooks
        entry:
          id: "{uuid}"
          payload: {canary: true, trace_id: "{trace_id}"}
          attempt: 1
          created_at: "{now_epoch_s}"         # exactly one placeholder: written as a number
    hops:
      - name: parked
        target: 1s
        redis_dlq: {key: dlq:webhooks}
      - name: first_retry
        after: parked
        target: 60s
        redis_dlq: {key: dlq:webhooks, event: retry}
"""


def approval(webhook: bool, smtp: bool) -> str:
    hops = ""
    if webhook:
        hops += """\
      - name: slack
        target: 5m
        webhook: {path: slack}                # the funnel posts to http://<receiver>/slack
"""
    if smtp:
        hops += """\
      - name: email
        target: 5m
        smtp: {}
"""
    return (
        """\
  approval:                                   # SLO: approval request -> notification < 5 min
    interval: 15m
    inject:
      http:
        url: ${FUNNEL_URL}/api/v1/approvals
        auth: app
        json:
          resource: invoice/canary-{probe_id}
          requester: canary+{trace_id}@example.com
          metadata: {canary_trace_id: "{trace_id}", synthetic: true}
        capture: {approval_id: id}
    hops:
"""
        + hops
        + """\
    cleanup:                                  # withdraw it, so it never trips the app's own SLA alert
      - {method: DELETE, url: "${FUNNEL_URL}/api/v1/approvals/{capture.approval_id}", auth: app}
"""
    )


def starter_spec(
    posthog: bool = False,
    redis_dlq: bool = False,
    webhook: bool = False,
    smtp: bool = False,
    name: str = "funnel.yaml",
) -> str:
    """The starter text; with no sink named, PostHog only."""
    if not (posthog or redis_dlq or webhook or smtp):
        posthog = True
    chosen = {"posthog": posthog, "redis_dlq": redis_dlq, "webhook": webhook, "smtp": smtp}
    env = ["FUNNEL_URL", "FUNNEL_USER", "FUNNEL_PASSWORD"] if (posthog or webhook or smtp) else []
    if posthog:
        env += ["POSTHOG_HOST", "POSTHOG_PROJECT_ID", "POSTHOG_PERSONAL_API_KEY"]
    if redis_dlq:
        env.append("DLQ_REDIS_URL")
    flags = "".join(f" --{k.replace('_', '-')}" for k, v in chosen.items() if v)
    env_lines = "".join(f"#   export {v}=...\n" for v in env)
    text = HEADER.format(flags=flags, name=name, env=env_lines)
    if not (posthog or webhook or smtp):  # no HTTP step: no login needed
        start, end = text.index("# Credentials"), text.index("collectors:")
        text = text[:start] + text[end:]
    text += "".join(COLLECTORS[k] for k, v in chosen.items() if v)
    text += "\nsteps:\n"
    if posthog:
        text += LEAD
    if redis_dlq:
        text += DLQ
    if webhook or smtp:
        text += approval(webhook, smtp)
    return text
