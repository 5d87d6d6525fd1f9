{#- The vmpower beacon may have missed events (connected, reconnected, overflow, restarted):
    run a full sync on the minion that says so. #}
{%- set minion_id = tag.split('/')[2] %}
vmpower sync:
  local.vmpower.sync:
    - tgt: {{ minion_id | yaml_dquote }}
    - tgt_type: list
