"""One module per ``fluxserve`` subcommand."""
