"""The composition root: the app factory (`main`), the CLI (`cli`), health routes and the HTTP
protocol the server runs. It imports the services; nothing imports it."""
