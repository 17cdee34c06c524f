"""The web app: one page and a JSON API over the Predictor."""
