"""The REST service: `create_app(settings)` in `service.api.app`, the "search" job kind in
`service.api.search_job`. Importing this package imports nothing heavy, so workers can register the kind."""
