from alignpipe.cli import app

app(prog_name="alignpipe")
