"""The swarm health dashboard: a live web page, a JSON API and Prometheus metrics from one process.

- `swarm.dashboard.state`: pure functions from records read from the DHT to `/api/state` and `/metrics`;
- `swarm.dashboard.source`: reads the DHT, at most once per refresh period for all viewers;
- `swarm.dashboard.server`: the HTTP server (`Dashboard`, `DashboardConfig`) and the static page.

Started by `swarm dashboard` (cli/dashboard.py); described in docs/dashboard.md.
"""
