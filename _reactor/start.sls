{#- A minion (re)started: whatever happened to its VMs while it was down, and any retry that
    fell due meanwhile, is picked up by a full sync.

    Tag: salt/minion/<minion id>/start
    Targeted as a one-element list; a tag whose minion id is not a plain id is ignored. #}
{%- set parts = tag.split('/') %}
{%- set minion_id = parts[2] if parts | length > 3 else '' %}
{%- set ns = namespace(valid=minion_id != '' and minion_id[0] not in '.-') %}
{%- for char in minion_id %}
{%-   if char not in 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-' %}
{%-     set ns.valid = false %}
{%-   endif %}
{%- endfor %}
{%- if ns.valid %}
vmpower sync after start:
  local.vmpower.sync:
    - tgt:
      - {{ minion_id | yaml_dquote }}
    - tgt_type: list
{%- endif %}
