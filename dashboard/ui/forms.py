"""Dashboard forms: task and batch filters and application settings."""

from __future__ import annotations

import html

from django import forms
from django.utils.safestring import SafeString, mark_safe

from tasks import applications
from tasks.applications import InvalidApplication, validate_runner
from tasks.delivery import retry_policy
from tasks.models import Application, Batch, CallbackStatus, TaskStatus
from tasks.selectors.task_lists import BatchFilters, TaskFilters
from tasks.statuses import Priority

RETENTION_PRESETS = [("24", "1 day"), ("72", "3 days"), ("168", "7 days"), ("custom", "Custom")]
# How long the old API key / webhook secret keeps working after a rotation.
GRACE_CHOICES = [("0", "none (stops at once)"), ("1", "1 h"), ("24", "24 h"), ("168", "7 days")]
DEFAULT_GRACE_HOURS = 24
# Settings a POST may leave out (a page from before they existed, a script): left out, each
# keeps its current value rather than failing or clearing a cap.
KEPT_WHEN_ABSENT = (
    "default_priority", "max_concurrency_per_key", "max_queue_seconds", "auto_retry",
    "auto_retry_backoff_seconds", "signing", "circuit_failures", "disable_after_hours",
)  # fmt: skip


# The browser's datetime-local control shows no zone and wants "YYYY-MM-DDTHH:MM[:SS]"; the
# value is read in the operator's zone (dashboard.ui.zones), which the filter bar names.
LOCAL_DATETIME = forms.DateTimeInput(attrs={"type": "datetime-local", "step": "1"},
                                     format="%Y-%m-%dT%H:%M:%S")  # fmt: skip


def _attrs(attrs: dict) -> str:
    """django/forms/widgets/attrs.html."""
    return "".join(
        f" {name}" if value is True else f' {name}="{html.escape(str(value))}"'
        for name, value in attrs.items()
        if value is not False
    )


class QuickSelect(forms.Select):
    """A select written in Python: the markup of Django's select.html and select_option.html
    (optgroups included), without a template include per option: with 50 applications the
    filter bar's application select cost 9 ms of the task list's render."""

    def render(self, name, value, attrs=None, renderer=None) -> SafeString:
        widget = self.get_context(name, value, attrs)["widget"]
        out = [f'<select name="{html.escape(str(widget["name"]))}"{_attrs(widget["attrs"])}>']
        for group_name, options, _ in widget["optgroups"]:
            if group_name:
                out.append(f'\n  <optgroup label="{html.escape(str(group_name))}">')
            for option in options:
                out.append(
                    f'\n  <option value="{html.escape(str(option["value"]))}"'
                    f"{_attrs(option['attrs'])}>{html.escape(str(option['label']))}</option>\n"
                )
            if group_name:
                out.append("\n  </optgroup>")
        out.append("\n</select>")
        return mark_safe("".join(out))  # noqa: S308 (every value in it escaped)


class TaskFilterForm(forms.Form):
    application = forms.ModelChoiceField(
        queryset=Application.objects.only("id", "name"), required=False, empty_label="All apps",
        widget=QuickSelect,
    )  # fmt: skip
    status = forms.ChoiceField(choices=[("", "Any status"), *TaskStatus.choices], required=False)
    callback_status = forms.ChoiceField(
        choices=[("", "Any callback"), *CallbackStatus.choices], required=False
    )
    priority = forms.ChoiceField(choices=[("", "Any priority"), *Priority.choices], required=False)
    created_from = forms.DateTimeField(required=False, widget=LOCAL_DATETIME)
    created_to = forms.DateTimeField(required=False, widget=LOCAL_DATETIME)
    q = forms.CharField(
        required=False,
        max_length=255,
        widget=forms.TextInput(attrs={"placeholder": "task id (or prefix) or user"}),
    )
    # An error group of the Failures page (16 hex digits, tasks.triage).
    error_fingerprint = forms.RegexField(
        regex=r"^[0-9a-f]{16}$", required=False, widget=forms.HiddenInput
    )
    callback_error_fingerprint = forms.RegexField(
        regex=r"^[0-9a-f]{16}$", required=False, widget=forms.HiddenInput
    )

    def filters(self) -> TaskFilters:
        """The valid filters (invalid fields are ignored, and shown as errors)."""
        self.is_valid()  # fills cleaned_data with the fields that are valid
        data = self.cleaned_data
        application = data.get("application")
        return TaskFilters(
            application=str(application.pk) if application else "",
            status=data.get("status") or "",
            callback_status=data.get("callback_status") or "",
            priority=data.get("priority") or "",
            created_from=data.get("created_from"),
            created_to=data.get("created_to"),
            q=(data.get("q") or "").strip(),
            error_fingerprint=data.get("error_fingerprint") or "",
            callback_error_fingerprint=data.get("callback_error_fingerprint") or "",
        )


class BatchFilterForm(forms.Form):
    application = forms.ModelChoiceField(
        queryset=Application.objects.only("id", "name"), required=False, empty_label="All apps"
    )
    status = forms.ChoiceField(choices=[("", "Any status"), *Batch.Status.choices], required=False)

    def filters(self) -> BatchFilters:
        """The valid filters (invalid fields are ignored, and shown as errors)."""
        self.is_valid()
        application = self.cleaned_data.get("application")
        return BatchFilters(
            application=str(application.pk) if application else "",
            status=self.cleaned_data.get("status") or "",
        )


class ApplicationForm(forms.ModelForm):
    retry_schedule_text = forms.CharField(
        label="Retry schedule (s)",
        help_text="Seconds between callback retries, e.g. 10,60,300. Empty: no retries.",
        required=False,
    )
    runner_config = forms.JSONField(required=False, initial=dict)
    retention_preset = forms.ChoiceField(label="Retention", choices=RETENTION_PRESETS)
    retention_custom_hours = forms.IntegerField(
        label="Custom retention (hours)", required=False, min_value=1, max_value=365 * 24
    )
    # 0, like empty, is no cap / no bound (as on the command line): the model's minimum is 1.
    max_concurrency_per_key = forms.IntegerField(
        label="Max concurrency per key",
        required=False,
        min_value=0,
        help_text="Runs queued or running at once per concurrency_key (else user); more wait "
        "in their key's line. Empty or 0 = no cap.",
    )
    max_queue_seconds = forms.IntegerField(
        label="Max time in queue (s)",
        required=False,
        min_value=0,
        max_value=7 * 24 * 3600,
        help_text="A run not started within this fails with error_code deadline_exceeded. "
        "Empty or 0 = no bound.",
    )

    class Meta:
        model = Application
        fields = [
            "name", "runner", "runner_config", "callback_timeout_seconds",
            "blocking_timeout_seconds", "job_timeout_seconds", "task_retries", "max_concurrency",
            "queue_threshold_seconds", "run_threshold_seconds", "rate_limit_per_second",
            "rate_limit_burst", "endpoint_max_in_flight", "default_priority",
            "max_concurrency_per_key", "max_queue_seconds", "auto_retry",
            "auto_retry_backoff_seconds", "signing", "circuit_failures", "disable_after_hours",
        ]  # fmt: skip
        labels = {
            "auto_retry": "Automatic retries",
            "auto_retry_backoff_seconds": "Automatic retry backoff (s)",
        }
        help_texts = {
            "rate_limit_per_second": "Requests per second per API key; 0 = unlimited.",
            "rate_limit_burst": "Requests a key may make at once before the rate applies.",
            "max_concurrency": "Tasks queued or running at once; empty or 0 = no cap.",
            "blocking_timeout_seconds": "Empty: BLOCKING_TIMEOUT.",
            "endpoint_max_in_flight": "Deliveries in flight at once per callback origin, across "
            "all callback workers; more wait their turn without holding a thread. 0 = no cap.",
            "default_priority": "The lane of a submit that names no priority.",
            "auto_retry": "New runs after a retryable failure (0-10); 0 = off.",
            "auto_retry_backoff_seconds": "Seconds before the first automatic retry, doubling "
            "for each next one (0-3600).",
            "signing": "HMAC with the webhook secret (v1), Ed25519 with a key published at "
            "/.well-known/taskhook/jwks.json (v1a; receivers hold no secret), or both.",
            "circuit_failures": "Consecutive failed attempts that open an endpoint's circuit: "
            "its callbacks then wait, without spending attempts, while probes test it.",
            "disable_after_hours": "An endpoint failing this long without a success is "
            "disabled (its callbacks are given up) until an operator re-enables it.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        app = self.instance
        schedule = app.retry_schedule if app.pk else list(retry_policy.DEFAULT_SCHEDULE)
        self.fields["retry_schedule_text"].initial = ",".join(str(s) for s in schedule)
        hours = app.retention_hours if app.pk else 24
        preset = str(hours) if str(hours) in {"24", "72", "168"} else "custom"
        self.fields["retention_preset"].initial = preset
        self.fields["retention_custom_hours"].initial = hours if preset == "custom" else None
        # Left out of a POST (an older page, a script): the current value, not an error.
        self.fields["endpoint_max_in_flight"].required = False
        for name in KEPT_WHEN_ABSENT:
            self.fields[name].required = False

    def clean_endpoint_max_in_flight(self) -> int:
        value = self.cleaned_data.get("endpoint_max_in_flight")
        if value is None:
            return self.instance.endpoint_max_in_flight
        return value

    def clean_runner(self) -> str:
        runner = self.cleaned_data["runner"].strip()
        try:
            validate_runner(runner)
        except InvalidApplication as exc:
            raise forms.ValidationError(exc.message) from exc
        return runner

    def clean_runner_config(self):
        value = self.cleaned_data.get("runner_config")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError("Runner config must be a JSON object.")
        return value

    def clean_retry_schedule_text(self) -> list[int]:
        try:
            return retry_policy.parse_schedule(self.cleaned_data.get("retry_schedule_text") or "")
        except retry_policy.InvalidSchedule as exc:
            raise forms.ValidationError(str(exc)) from exc

    def clean_max_concurrency_per_key(self) -> int | None:
        return self.cleaned_data.get("max_concurrency_per_key") or None

    def clean_max_queue_seconds(self) -> int | None:
        return self.cleaned_data.get("max_queue_seconds") or None

    def clean(self):
        cleaned = super().clean()
        assert cleaned is not None  # ModelForm.clean returns cleaned_data
        for name in KEPT_WHEN_ABSENT:
            if self.add_prefix(name) not in self.data:
                cleaned[name] = getattr(self.instance, name)
        preset = cleaned.get("retention_preset")
        if preset == "custom":
            hours = cleaned.get("retention_custom_hours")
            if not hours:
                self.add_error("retention_custom_hours", "Give the retention in hours (1 to 8760).")
            else:
                cleaned["retention_hours"] = hours
        elif preset:
            cleaned["retention_hours"] = int(preset)
        return cleaned

    def _post_clean(self) -> None:
        # The model's validators, on the fields above (private ModelForm hook, not in django-stubs).
        super()._post_clean()  # type: ignore[misc]
        if self.errors:
            return
        # Then the service's own check, the one `setapplication` runs, so both accept the same.
        try:
            applications.clean_settings(self.settings())
        except InvalidApplication as exc:
            self.add_error(self._form_field(exc.field), exc.message)

    def _form_field(self, setting: str) -> str | None:
        if setting == "retry_schedule":
            return "retry_schedule_text"
        if setting == "retention_hours":
            custom = self.cleaned_data.get("retention_preset") == "custom"
            return "retention_custom_hours" if custom else "retention_preset"
        return setting if setting in self.fields else None

    def settings(self) -> dict:
        """The cleaned settings as keyword arguments of the application services."""
        data = self.cleaned_data
        return {name: data[name] for name in self.Meta.fields} | {
            "retry_schedule": data["retry_schedule_text"],
            "retention_hours": data["retention_hours"],
        }

    def save(self, commit: bool = True) -> Application:
        """Update the application through the service (validated again, `updated_at` bumped).
        Creating goes through applications.create_application(**form.settings())."""
        if not self.instance.pk:
            raise ValueError("ApplicationForm.save() updates; create with create_application")
        return applications.update_application(application_id=self.instance.pk, **self.settings())


# What a settings change records, old -> new (no secrets: keys and the webhook secret are not
# settings).
APPLICATION_AUDITED_FIELDS = (*ApplicationForm.Meta.fields, "retry_schedule", "retention_hours")


class RotateForm(forms.Form):
    grace_hours = forms.TypedChoiceField(
        label="old one valid for",
        choices=GRACE_CHOICES,
        coerce=int,
        required=False,
        # A POST without the field keeps the old behaviour. Any value may be empty_value;
        # django-stubs says str | None.
        empty_value=DEFAULT_GRACE_HOURS,  # type: ignore[arg-type]
        initial=str(DEFAULT_GRACE_HOURS),
    )
