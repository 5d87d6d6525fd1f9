{#- The vmpower beacon may have missed events (connected, reconnected, restarted, overflow,
    burst, master_reconnected): run a full sync on the minion that says so.

    Tag: salt/beacon/<minion id>/vmpower/resync
    Targeted as a one-element list; a tag whose minion id is not a plain id is ignored. #}
{%- set parts = tag.split('/') %}
{%- set minion_id = parts[2] if parts | length > 4 else '' %}
{%- set ns = namespace(valid=minion_id != '' and minion_id[0] not in '.-') %}
{%- for char in minion_id %}
{%-   if char not in 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-' %}
{%-     set ns.valid = false %}
{%-   endif %}
{%- endfor %}
{%- if ns.valid %}
vmpower sync:
  local.vmpower.sync:
    - tgt:
      - {{ minion_id | yaml_dquote }}
    - tgt_type: list
{%- endif %}
