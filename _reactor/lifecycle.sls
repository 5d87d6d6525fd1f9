{#- A lifecycle event from a minion's vmpower beacon: reconcile that VM on that minion.

    Tag: salt/beacon/<minion id>/vmpower/lifecycle/<transition>
    The event is only a trigger: vmpower.reconcile decides on the live state of the minion
    that runs it, so a forged event causes at most a re-check. The minion id is taken from the
    tag and targeted as a literal list, never as a glob. #}
{%- set minion_id = tag.split('/')[2] %}
vmpower reconcile {{ data.get('uuid', '') | string | yaml_encode }}:
  local.vmpower.reconcile:
    - tgt: {{ minion_id | yaml_dquote }}
    - tgt_type: list
    - kwarg:
        uuid: {{ data.get('uuid', '') | string | yaml_dquote }}
        transition: {{ data.get('transition', '') | string | yaml_dquote }}
