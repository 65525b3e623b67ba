"""Pages the app serves to a browser (no data in them: they fetch it with the user's token)."""
