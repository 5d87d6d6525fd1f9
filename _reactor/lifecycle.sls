{#- A lifecycle event from a minion's vmpower beacon: reconcile that VM on that minion.

    Tag: salt/beacon/<minion id>/vmpower/lifecycle/<transition>
    The event is only a trigger: vmpower.reconcile decides on the live state of the minion
    that runs it and on what that minion's own beacon journaled as the event's seq, never on
    what the event claims, so a forged event causes at most a re-check. The minion id is
    taken from the tag and targeted as a one-element list (a string target of type list is
    split on commas by Salt); a tag whose minion id is not a plain id (letters, digits,
    . _ -) is ignored. #}
{%- set parts = tag.split('/') %}
{%- set minion_id = parts[2] if parts | length > 4 else '' %}
{%- set ns = namespace(valid=minion_id != '' and minion_id[0] not in '.-') %}
{%- for char in minion_id %}
{%-   if char not in 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-' %}
{%-     set ns.valid = false %}
{%-   endif %}
{%- endfor %}
{%- if ns.valid and data.get('uuid') %}
vmpower reconcile {{ data.get('uuid', '') | string | yaml_encode }}:
  local.vmpower.reconcile:
    - tgt:
      - {{ minion_id | yaml_dquote }}
    - tgt_type: list
    - kwarg:
        uuid: {{ data.get('uuid', '') | string | yaml_dquote }}
        transition: {{ data.get('transition', '') | string | yaml_dquote }}
        reason: {{ data.get('reason', '') | string | yaml_dquote }}
        seq: {{ data.get('seq', '') | string | yaml_dquote }}
{%- endif %}
