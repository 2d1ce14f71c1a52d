"""The host worker: joins the network, heartbeats, serves tasks from its capability subjects."""
