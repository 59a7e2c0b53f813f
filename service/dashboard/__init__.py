"""The web dashboard: server-rendered pages under `/ui/` (searches, a search's Pareto front, allocations,
sensitivity heatmap, jobs, uploads, schedules) and the small cookie-authenticated JSON endpoints under
`/ui/api/` their scripts call. `create_app` includes `router`."""

from .routes import router

__all__ = ["router"]
