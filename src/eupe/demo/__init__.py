"""`eupe demo`: the EUPE recipe in miniature on committed photos and two real pretrained experts."""
