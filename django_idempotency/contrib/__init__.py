"""Optional integrations, each enabled on its own and importing its library only when used."""
