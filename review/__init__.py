"""`booruset review`: a local web app over a workspace to look at, filter and correct a dataset."""
